"""Training: data sources, the FeatureSpec, Wide & Deep and DLRM models, the train loop."""
