"""The scripts in generate/; an installed minillama has them as minillama.recipes.generate (console scripts: see
minillama/recipes/__init__.py)."""
