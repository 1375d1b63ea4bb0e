"""Glue to DeepSpeed and Hugging Face; optional dependencies are imported only here."""
