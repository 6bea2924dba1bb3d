"""`python -m glm_tp.generate` / `torchrun -m glm_tp.generate`: the command line in `glm_tp.cli.generate`."""
from glm_tp.cli.generate import main

if __name__ == "__main__":
    main()
