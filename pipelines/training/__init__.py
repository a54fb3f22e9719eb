"""One Ray Train loop for every objective: a Task (model + loss + batch keys) plugs into it."""
