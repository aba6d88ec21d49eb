"""Files: writing them atomically, and finding them locally or on the Hugging Face hub."""
