"""Using a trained encoder: classifiers trained on it (`amdim evaluate`), its features
(`amdim extract`), its mixture maps (`amdim segment`) and figures (`amdim plots`)."""
