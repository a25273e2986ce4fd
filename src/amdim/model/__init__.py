"""The method: the encoder (images -> r1, r5, r7) and other backbones under the paper's heads,
the NCE objective and its mixtures, the AMDIM module and its multiview form, the probes and
classifiers, and the features of a frozen encoder. Knows neither the data nor the views: it
takes tensors."""
