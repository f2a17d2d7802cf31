"""Stage one: teachers, data mix, views and the cache builder."""
