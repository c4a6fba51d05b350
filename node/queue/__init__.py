"""The durable work queue: tables, job states and the repository that changes them."""
