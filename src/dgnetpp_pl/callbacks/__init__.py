"""Lightning callbacks: pseudo-labelling, image grids and the progress bar."""
