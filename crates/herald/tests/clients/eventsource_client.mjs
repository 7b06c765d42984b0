// Reads herald's stream with the npm `eventsource` package; prints `data:<data>` per event.
// Started by tests/blackbox/clients.rs with the stream URL as its argument.
import { EventSource } from 'eventsource';

const source = new EventSource(process.argv[2]);
source.onopen = () => console.log('status:200');
source.onmessage = (event) => console.log('data:' + event.data);
source.onerror = (error) => console.error('eventsource error', error.message ?? error);
