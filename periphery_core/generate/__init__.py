"""Text generation: decoder LLMs split over stateful stages that keep their own KV caches."""
