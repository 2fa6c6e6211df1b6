"""One module per checkpoint format; each maps its key names onto MambaMoELM's and reports every problem at once."""
