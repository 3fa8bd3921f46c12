"""Using a trained model: loading it, predicting, evaluating, ensembles and saliency maps."""
