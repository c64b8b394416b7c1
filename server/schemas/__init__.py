"""The OpenAI API's shapes (and loraforge's own) as msgspec Structs, one module per resource."""
