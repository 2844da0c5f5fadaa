"""Local training: the round's instructions, the loss, the one trainer and optimiser, and the executors."""
