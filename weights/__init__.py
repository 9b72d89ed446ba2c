"""The scripts in weights/; an installed minillama has them as minillama.recipes.weights (console scripts: see
minillama/recipes/__init__.py)."""
