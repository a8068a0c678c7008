"""Model families, block ranges and plans, lazy weight loading."""
