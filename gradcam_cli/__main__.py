"""`python -m gradcam_cli` runs the same CLI as the `gradcam` console script."""

from gradcam_cli.cli import main

if __name__ == "__main__":
    main()
