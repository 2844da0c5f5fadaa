"""Backends carry a round's plan to the clients and their updates back."""
