"""TorchServe handlers of the recommender bundle; packed into every .mar by export.archive."""
