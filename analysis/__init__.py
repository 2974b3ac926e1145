"""What a trained dictionary does: evaluation, examples, attribution, steering, dashboard."""
