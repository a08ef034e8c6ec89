"""Trace loaders, the HTTP replay client, the virtual-time simulation driver, reports."""
