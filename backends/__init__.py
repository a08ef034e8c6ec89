"""The backend side: real SGLang servers and a simulated SGLang engine for CPU-only machines."""
