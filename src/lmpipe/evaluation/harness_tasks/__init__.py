"""lm-evaluation-harness task configs (YAML) over lmpipe's offline data, and their functions."""
