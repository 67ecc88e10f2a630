"""The recipe (setup → loop → save), its step, validation, optimizers, EMA, class images."""
