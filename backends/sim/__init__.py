"""A simulated SGLang server: radix cache, continuous batching and a roofline cost model.

This package plays the GPU. It never imports `router`: it must not peek at the router.
"""
