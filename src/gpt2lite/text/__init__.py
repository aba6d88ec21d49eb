"""Strings in, strings out: the text generator, the text classifier, scoring and text metrics."""
