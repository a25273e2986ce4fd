"""Where the images come from, and in which order: image files and their checks, the datasets
(digits, torchvision's, folders, the compact .npz store), the whole set held in device memory,
the order of each epoch's batches, and sources whose items are several views of one scene.

The ground wing: it imports no other wing. What turns an image into views is handed in by the
caller (a transform, a views callable), so that the data knows nothing of how views are made.
"""
