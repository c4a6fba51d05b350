"""Sending results to the destinations (C-STORE SCU) with retries."""
