"""Fine-tuning VideoNSA: annotation readers, `data prepare` manifests, the on-the-fly dataset, the Trainer recipe.

Heavy imports (torch, transformers) happen inside the submodules that need them, so that reading annotations or
writing a manifest stays light.
"""
