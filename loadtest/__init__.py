"""Load testing and REST clients for the served models."""
