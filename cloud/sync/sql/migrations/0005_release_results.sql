-- A device's release_result messages by the command they answer (issue 17): what a
-- release rollout reads for the bytes each device downloaded. Add only.
CREATE INDEX sync_messages_release_results ON sync_messages (device_id, (payload->>'command_id'))
    WHERE topic = 'release_result';
