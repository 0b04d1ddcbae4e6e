"""Lightning callbacks: pseudo-labelling and image grids."""
