"""The C-STORE / C-ECHO listener."""
