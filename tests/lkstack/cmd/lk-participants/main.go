// Command lk-participants connects real LiveKit clients (the LiveKit Go SDK) for the
// end-to-end tests and the demo, driven over stdin/stdout with one JSON object per line:
//
//	{"op": "join", "ref": "c1", "url": "ws://...", "token": "<jwt>"}        a full client: signal and WebRTC connected (ACTIVE)
//	{"op": "join_signal_only", "ref": "c2", "url": "ws://...", "token": "<jwt>"}  only the signalling websocket, no offer (JOINING)
//	{"op": "leave", "ref": "c1"}
//
// Each command gets one answer line: {"ref": "c1", "ok": true, "identity": "...", "room": "..."}
// or {"ref": "c1", "ok": false, "error": "..."}. Commands run one at a time, in order.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/gorilla/websocket"
	lksdk "github.com/livekit/server-sdk-go/v2"
)

type command struct {
	Op    string `json:"op"`
	Ref   string `json:"ref"`
	URL   string `json:"url"`
	Token string `json:"token"`
}

type answer struct {
	Ref      string `json:"ref"`
	OK       bool   `json:"ok"`
	Error    string `json:"error,omitempty"`
	Identity string `json:"identity,omitempty"`
	Room     string `json:"room,omitempty"`
}

// A connected client: a full SDK room, or a bare signalling websocket.
type client struct {
	room *lksdk.Room
	ws   *websocket.Conn
}

func (c *client) leave() {
	if c.room != nil {
		c.room.Disconnect()
	}
	if c.ws != nil {
		_ = c.ws.Close()
	}
}

func join(cmd command) (*client, answer, error) {
	room, err := lksdk.ConnectToRoomWithToken(cmd.URL, cmd.Token, &lksdk.RoomCallback{},
		lksdk.WithAutoSubscribe(false))
	if err != nil {
		return nil, answer{}, err
	}
	return &client{room: room}, answer{Identity: string(room.LocalParticipant.Identity()),
		Room: room.Name()}, nil
}

// joinSignalOnly opens LiveKit's signalling websocket and sends nothing: the server has the
// participant JOINING until it gives up waiting for an offer.
func joinSignalOnly(cmd command) (*client, answer, error) {
	base := strings.TrimRight(cmd.URL, "/")
	target := fmt.Sprintf("%s/rtc?access_token=%s&auto_subscribe=0&protocol=15&sdk=go",
		base, url.QueryEscape(cmd.Token))
	dialer := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	ws, resp, err := dialer.Dial(target, nil)
	if err != nil {
		if resp != nil {
			return nil, answer{}, fmt.Errorf("%v (HTTP %d)", err, resp.StatusCode)
		}
		return nil, answer{}, err
	}
	// Wait for the server's first message (the join response): the participant exists then.
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := ws.ReadMessage(); err != nil {
		ws.Close()
		return nil, answer{}, fmt.Errorf("no join response: %v", err)
	}
	_ = ws.SetReadDeadline(time.Time{})
	go func() { // keep reading so pings are answered
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	}()
	return &client{ws: ws}, answer{}, nil
}

func main() {
	clients := map[string]*client{}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var cmd command
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			_ = out.Encode(answer{OK: false, Error: "bad command: " + err.Error()})
			continue
		}
		reply := answer{Ref: cmd.Ref}
		var err error
		switch cmd.Op {
		case "join", "join_signal_only":
			if old, ok := clients[cmd.Ref]; ok {
				old.leave()
				delete(clients, cmd.Ref)
			}
			connect := join
			if cmd.Op == "join_signal_only" {
				connect = joinSignalOnly
			}
			var c *client
			var got answer
			c, got, err = connect(cmd)
			if err == nil {
				clients[cmd.Ref] = c
				reply.Identity, reply.Room = got.Identity, got.Room
			}
		case "leave":
			c, ok := clients[cmd.Ref]
			if !ok {
				err = fmt.Errorf("no client %q", cmd.Ref)
				break
			}
			c.leave()
			delete(clients, cmd.Ref)
		default:
			err = fmt.Errorf("unknown op %q", cmd.Op)
		}
		if err != nil {
			reply.Error = err.Error()
		} else {
			reply.OK = true
		}
		_ = out.Encode(reply)
	}
	for _, c := range clients {
		c.leave()
	}
}
