"""Hydra config groups: model/ optim/ data/ trainer/ logging/ parallel/ checkpoint/ experiment/."""
