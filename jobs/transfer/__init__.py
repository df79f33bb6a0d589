"""Transfer: labelled downstream tasks, zero-shot evaluation, and fine-tuning of a pretrained encoder."""
