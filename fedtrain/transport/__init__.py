"""How a round's work reaches the clients and their updates come back."""
