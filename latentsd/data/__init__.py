"""Datasets for latentsd."""
