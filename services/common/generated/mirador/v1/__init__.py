"""Generated from protos/ by protos/generate_python.py. Do not edit."""
