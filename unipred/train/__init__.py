"""Layer 3, training: recipe loading (config), optimizer and schedule, callbacks, Lightning
trainer set-up, checkpoint reading/writing and ``model.init=`` sources, and the engine
(``fit``) that runs any registered task."""
