"""Bad and unexpected input: every case has a defined outcome, and the node keeps answering."""
