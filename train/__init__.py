"""The scripts in train/; an installed minillama has them as minillama.recipes.train (console scripts: see
minillama/recipes/__init__.py)."""
