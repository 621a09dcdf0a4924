// A server-sent-events parser for streams read with fetch() (EventSource
// cannot send an Authorization header, and the token must not go into a URL).
// Feed it text as it arrives; it calls onEvent({event, id, data}) per event.
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = '';
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = '';
  }

  push(text) {
    this.buffer += text;
    // Lines end with \n, \r\n or \r; a lone \r at the end may be half of \r\n.
    for (;;) {
      const m = /\r\n|\n|\r(?!$)/.exec(this.buffer);
      if (!m) break;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      this.line(line);
    }
    // A stream that never sends a newline must not grow without end.
    if (this.buffer.length > 4 << 20) throw new Error('event line longer than 4 MiB');
  }

  line(line) {
    if (line === '') {
      if (this.data.length > 0) {
        this.onEvent({ event: this.event || 'message', id: this.id, data: this.data.join('\n') });
      }
      this.reset();
      return;
    }
    if (line.startsWith(':')) return;  // a comment (keep-alive)
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id') this.id = value;
  }
}
