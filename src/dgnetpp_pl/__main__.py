"""``python -m dgnetpp_pl``: the Hydra training entry point."""

from dgnetpp_pl.train import main

if __name__ == "__main__":
    main()
