"""What the encoder sees of an image: the paper's two augmented views, per image with PIL
(image_views, augment, the Fast AutoAugment table) and per batch on the device (batch_views,
batch_geometry, batch_policy), and the views of a context that the data itself provides
(view_sets). Imports the data wing at most, never the model."""
