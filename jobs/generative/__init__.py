"""DALL-E inside the cluster: the frozen dVAE a stage-2 run loads, and the evaluation of generated
images against their captions on the shapes world (the renderer's own statistics)."""
