"""Reading images and targets, the decode-once cache, splits and the batch loader."""
