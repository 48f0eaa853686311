"""Training experts in place: `moepager tune` fine-tunes chosen routed experts of a store on text, the frozen
ones paged through the expert cache, and commits the result as generations of the store (tune.py).

Imports the engine and everything below it; nothing imports it but the command line.
"""
