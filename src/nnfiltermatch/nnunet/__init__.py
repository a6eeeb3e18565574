"""Every reach into nnU-Net's internals: the trainer and its hooks, the unlabelled loader, pool scoring, the
predictor.
"""
