import { useEffect, useState, useCallback } from 'preact/hooks';
import { api, follow } from './api.js';

// GET path once (and again when it changes); {data, error, loading, reload}.
export function useApi(path) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const [n, setN] = useState(0);
  useEffect(() => {
    if (!path) return undefined;
    let live = true;
    setState((s) => ({ ...s, loading: true, error: null }));
    api(path).then(
      (data) => live && setState({ data, error: null, loading: false }),
      (error) => live && setState({ data: null, error, loading: false }),
    );
    return () => {
      live = false;
    };
  }, [path, n]);
  const reload = useCallback(() => setN((x) => x + 1), []);
  return { ...state, reload };
}

// A topic's live snapshots: the newest one, and the stream's status.
export function useStream(topic, id) {
  const [snapshot, setSnapshot] = useState(null);
  const [status, setStatus] = useState('connecting');
  useEffect(() => {
    setSnapshot(null);
    setStatus('connecting');
    return follow(topic, id, setSnapshot, setStatus);
  }, [topic, id]);
  return { snapshot, status };
}
