"""The Hydra configs, shipped as package data: config.yaml here, the groups in groups/.

A package (not a bare directory) so that Hydra can find the groups as pkg://snoo_train.configs.groups
in a wheel install as well as in a checkout.
"""
