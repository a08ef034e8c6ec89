"""The sans-IO routing brain: no asyncio, no sockets, no clocks of its own.

Time (`now`) and randomness (`random.Random`) come in as arguments, so the same decisions
run in the live proxy and in the virtual-time simulator.
"""
