"""Stage two: the student, projectors, losses and the loop that trains them from caches."""
